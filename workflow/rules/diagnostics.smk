# Chain diagnostics per task: the traces of seed 0's lambdas, and how far the seeds agree
# (Spearman of their posterior-mean lambdas, Jaccard of bayestune's masks at each budget).
# Each stage-1 run writes its own diagnostics beside its scale file (rule sample); this rule
# only draws them. Cheap; runs on the submitting machine (localrules in the Snakefile).


rule chain_figures:
    input:
        unpack(chain_figure_inputs),
    output:
        traces=report(f"{RES}/figures/{{task}}/lambda_traces.png",
                      caption="../report/lambda_traces.rst",
                      category="Figures per task", subcategory="{task}"),
        table=f"{RES}/figures/{{task}}/seed_agreement.csv",
        heatmap=report(f"{RES}/figures/{{task}}/seed_agreement.png",
                       caption="../report/seed_agreement.rst",
                       category="Figures per task", subcategory="{task}"),
    log:
        f"{RES}/logs/figures/{{task}}_chain.log",
    params:
        code=code("diagnose"),
        out_dir=lambda wildcards, output: os.path.dirname(output.table),
        masks=lambda wildcards, input: (
            " --masks " + " ".join(map(shlex.quote, input.masks))) if input.masks else "",
    threads: 1
    resources:
        mem_mb=res("report", "mem_mb"),
        runtime=res("report", "runtime"),
    conda:
        "../envs/bayestune.yaml"
    shell:
        "python -m bayestune -q diagnose {input.scales:q}{params.masks}"
        " --figures-dir {params.out_dir:q} > {log:q} 2>&1"
