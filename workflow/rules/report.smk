# Report: the paper's tables rebuilt from what the runs wrote, the paper's numbers beside ours.


rule report:
    input:
        run_metrics(TABLE_RUNS + DISTILLED + [TEACHER]),
        transfer_metrics(),
    output:
        md=f"{REPORTS}/report.md",
        html=f"{REPORTS}/report.html",
    params:
        report_inputs=lambda wildcards: [config["profile"], config["study"]],
    shell:
        f"{PY}.report {ARGS}"
