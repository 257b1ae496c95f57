# Read, check and tokenise (or index, for images) one task's splits, once per run.


rule prepare:
    input:
        prepare_inputs,
    output:
        directory(f"{PREP}/{{task}}"),
    log:
        f"{RES}/logs/prepare/{{task}}.log",
    params:
        cli=BAYESTUNE,
        model=config["model"],
        max_length=config["max_length"],
        source=lambda wc: data_dir_flag(wc.task),
        task_file=lambda wc: task_file_flag(wc.task),
        declaration=lambda wc: task_declaration(wc.task),
    threads: res("prepare", "threads")
    resources:
        mem_mb=res("prepare", "mem_mb"),
        runtime=res("prepare", "runtime"),
    shell:
        "OMP_NUM_THREADS={threads} {params.cli} prepare --task {wildcards.task}"
        " --model {params.model:q} --out-dir {output} --max-length {params.max_length}"
        " {params.source} {params.task_file} > {log} 2>&1"
