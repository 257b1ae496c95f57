# Tables from every run's metrics.json (with BayesTune's paired differences against every
# other method, and the provenance of every run); figures of where the masks sit, of the
# scales, of score against budget, of the validation curves and of the paired differences.
# No GPU, little memory; run on the submitting machine (localrules in the Snakefile). Outputs
# flagged report() make up the page of `snakemake --report`, with the captions in
# workflow/report/.


rule report:
    input:
        all_metrics(),
    output:
        scores=report(f"{RES}/{BENCH}_scores.csv", caption="../report/scores.rst",
                      category="Tables"),
        table=report(f"{RES}/{BENCH}_table.csv", caption="../report/table.rst",
                     category="Tables"),
        markdown=f"{RES}/{BENCH}_table.md",
        html=report(f"{RES}/{BENCH}_table.html", caption="../report/table_page.rst",
                    category="Tables"),
        paired=report(f"{RES}/{BENCH}_paired.csv", caption="../report/paired.rst",
                      category="Tables"),
        provenance=report(provenance_file(), caption="../report/provenance.rst",
                          category="Tables"),
        selection=f"{RES}/{BENCH}_selection.csv",
    log:
        f"{RES}/logs/report.log",
    params:
        code=code("report"),
        benchmark=BENCH,
        model=MODEL,
        main_budget=budgets_flag([MAIN_BUDGET]),
        out_dir=lambda wildcards, output: os.path.dirname(output.table),
    threads: 1
    resources:
        mem_mb=res("report", "mem_mb"),
        runtime=res("report", "runtime"),
    conda:
        "../envs/bayestune.yaml"
    shell:
        "python -m bayestune report --benchmark {params.benchmark} --model {params.model:q}"
        " --main-budget {params.main_budget} --out-dir {params.out_dir:q}"
        " --metrics {input:q} > {log:q} 2>&1"


rule task_figures:
    input:
        scales=figure_scales,
        masks=figure_masks,
    output:
        [report(path, caption=f"../report/{os.path.basename(path)[:-4]}.rst",
                category="Figures per task", subcategory="{task}")
         for path in task_figures("{task}")],
    log:
        f"{RES}/logs/figures/{{task}}.log",
    params:
        code=code("figures"),
        inputs=figure_options,
        out_dir=lambda wildcards, output: os.path.dirname(output[0]),
    threads: 1
    resources:
        mem_mb=res("report", "mem_mb"),
        runtime=res("report", "runtime"),
    conda:
        "../envs/bayestune.yaml"
    shell:
        "python -m bayestune figures {params.inputs} --out-dir {params.out_dir:q} > {log:q} 2>&1"


use rule task_figures as score_figure with:
    input:
        scores_csv=f"{RES}/{BENCH}_scores.csv",
    output:
        report(f"{RES}/figures/score_vs_budget.png", caption="../report/score_vs_budget.rst",
               category="Scores"),
    log:
        f"{RES}/logs/figures/scores.log",


use rule task_figures as val_curves with:
    input:
        metrics=curve_metrics,
    output:
        report(f"{RES}/figures/{{task}}/val_curves.png", caption="../report/val_curves.rst",
               category="Figures per task", subcategory="{task}"),
    log:
        f"{RES}/logs/figures/{{task}}_curves.log",


use rule task_figures as paired_figure with:
    input:
        paired_csv=f"{RES}/{BENCH}_paired.csv",
    output:
        report(f"{RES}/figures/paired_differences.png",
               caption="../report/paired_differences.rst", category="Scores"),
    log:
        f"{RES}/logs/figures/paired.log",
