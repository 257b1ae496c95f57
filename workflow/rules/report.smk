# Tables from every run's metrics.json (with BayesTune's paired differences against every
# other method); figures of where the masks sit, of the scales, of score against budget, of
# the validation curves and of the paired differences. No GPU, little memory.


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
        main_budget=budgets_flag([MAIN_BUDGET]),
        out_dir=RES,
    threads: 1
    resources:
        mem_mb=res("report", "mem_mb"),
        runtime=res("report", "runtime"),
    shell:
        "{params.cli} report --benchmark {params.benchmark} --model {params.model:q}"
        " --main-budget {params.main_budget} --out-dir {params.out_dir}"
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


rule val_curves:
    input:
        curve_metrics,
    output:
        f"{RES}/figures/{{task}}/val_curves.png",
    log:
        f"{RES}/logs/figures/{{task}}_curves.log",
    params:
        cli=BAYESTUNE,
        out_dir=lambda wc: f"{RES}/figures/{wc.task}",
    threads: 1
    resources:
        mem_mb=res("report", "mem_mb"),
        runtime=res("report", "runtime"),
    shell:
        "{params.cli} figures --metrics {input} --out-dir {params.out_dir} > {log} 2>&1"


rule paired_figure:
    input:
        f"{RES}/{BENCH}_paired.csv",
    output:
        f"{RES}/figures/paired_differences.png",
    log:
        f"{RES}/logs/figures/paired.log",
    params:
        cli=BAYESTUNE,
        out_dir=f"{RES}/figures",
    threads: 1
    resources:
        mem_mb=res("report", "mem_mb"),
        runtime=res("report", "runtime"),
    shell:
        "{params.cli} figures --paired-csv {input} --out-dir {params.out_dir} > {log} 2>&1"
