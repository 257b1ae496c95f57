# Tables from every run's metrics.json; figures of where the masks sit, of the scales and of
# score against budget. No GPU, little memory.


rule report:
    input:
        all_metrics(),
    output:
        table_files(),
    log:
        f"{RES}/logs/report.log",
    params:
        cli=BAYESTUNE,
        benchmark=BENCH,
        model=config["model"],
        out_dir=RES,
    threads: 1
    resources:
        mem_mb=res("report", "mem_mb"),
        runtime=res("report", "runtime"),
    shell:
        "{params.cli} report --benchmark {params.benchmark} --model {params.model:q}"
        " --out-dir {params.out_dir}"
        " --metrics {input} > {log} 2>&1"


rule task_figures:
    input:
        scales=figure_scales,
        masks=figure_masks,
    output:
        task_figures("{task}"),
    log:
        f"{RES}/logs/figures/{{task}}.log",
    params:
        cli=BAYESTUNE,
        out_dir=lambda wc: f"{RES}/figures/{wc.task}",
    threads: 1
    resources:
        mem_mb=res("report", "mem_mb"),
        runtime=res("report", "runtime"),
    shell:
        "{params.cli} figures --scales {input.scales} --masks {input.masks}"
        " --out-dir {params.out_dir} > {log} 2>&1"


rule score_figure:
    input:
        f"{RES}/{BENCH}_scores.csv",
    output:
        f"{RES}/figures/score_vs_budget.png",
    log:
        f"{RES}/logs/figures/scores.log",
    params:
        cli=BAYESTUNE,
        out_dir=f"{RES}/figures",
    threads: 1
    resources:
        mem_mb=res("report", "mem_mb"),
        runtime=res("report", "runtime"),
    shell:
        "{params.cli} figures --scores-csv {input} --out-dir {params.out_dir} > {log} 2>&1"
