"""tricks-pipeline: re-run 'Bag of Tricks for Image Classification with CNNs' (He et al., 2019)."""
