# Read, check and tokenise (or index, for images) one task's splits, once per run. The data
# folder reaches the command through the environment (see common.smk); the param `source` is
# its content (a declared task's folder, if local), so that only new data reruns this.


rule prepare:
    output:
        directory(f"{PREP}/{{task}}"),
    log:
        f"{RES}/logs/prepare/{{task}}.log",
    params:
        code=CODE["prepare"],
        source=lambda wc: data_source(wc.task),
        task_file=lambda wc: task_file_flag(wc.task),
        declaration=lambda wc: task_declaration(wc.task),
        model=config["model"],
        max_length=config["max_length"],
    threads: res("prepare", "threads")
    resources:
        mem_mb=res("prepare", "mem_mb"),
        runtime=res("prepare", "runtime"),
    conda:
        "../envs/bayestune.yaml"
    shell:
        "OMP_NUM_THREADS={threads} python -m bayestune prepare --task {wildcards.task}"
        " --model {params.model:q} --out-dir {output:q} --max-length {params.max_length}"
        " {params.task_file} > {log:q} 2>&1"
