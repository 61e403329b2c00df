# Report: the paper's tables rebuilt from what the runs wrote, the paper's numbers beside ours.


rule report:
    input:
        run_metrics(TABLE_RUNS + DISTILLED),
        f"{RUNS}/{TEACHER}/seed{TEACHER_SEED}/metrics.json",
        transfer_metrics(),
    output:
        md=f"{REPORTS}/report.md",
        html=f"{REPORTS}/report.html",
    params:
        settings=graph.stage_settings(config, "report"),
        code=CODE["report"],
    log:
        "logs/report/report.log",
    conda:
        "../envs/pipeline.yaml"
    shell:
        f"{PY}.report {ARGS}{LOGGED}"
