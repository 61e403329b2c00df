"""Transfer learning (paper section 6): VOC detection and ADE20K segmentation data, metrics, evaluation.

`voc` and `ade20k` read the datasets in their released on-disk layouts, `metrics` holds GluonCV's
VOC AP and ADE20K pixel accuracy / mIoU, and `evaluate` is the command line that scores prediction
files against a dataset split. `train_detection` and `train_segmentation` are the stages, `finetune`
the run they share.
"""
