"""The report stage: the paper's tables and figures beside ours, built only from what the runs wrote.

`python -m pipeline_src.report` (see build.py) reads `<paths.runs>/**/metrics.json` and
`history.json`, the paper's numbers from paper_numbers.yaml, and writes report.md, a
self-contained report.html and the figures under `<paths.reports>`.
"""
