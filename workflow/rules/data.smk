# A text model cut to the tokens of the run's tasks (config key model_vocabulary: tasks), once
# per run, before any task is tokenised with it.
#
# Read, check and tokenise (or index, for images) one task's splits, once per run. The data
# folder reaches the command through the environment (see common.smk); the param `source` is
# its content (a declared task's folder, if local), so that only new data reruns this.


rule cut_vocabulary:
    output:
        directory(CUT_MODEL),
    log:
        f"{RES}/logs/cut_vocabulary.log",
    params:
        code=code("cut-vocabulary"),
        source=lambda wc: [data_source(task) for task in TASKS],
        architecture=ARCHITECTURE,
        model=config["model"],
        tasks=TASKS,
    threads: res("prepare", "threads")
    resources:
        mem_mb=res("prepare", "mem_mb"),
        runtime=res("prepare", "runtime"),
    conda:
        "../envs/bayestune.yaml"
    shell:
        "OMP_NUM_THREADS={threads} python -m bayestune cut-vocabulary --tasks {params.tasks:q}"
        " --model {params.model:q} --architecture {params.architecture}"
        " --out-dir {output:q} > {log:q} 2>&1"


rule prepare:
    input:
        model=[CUT_MODEL] if MODEL == CUT_MODEL else [],
    output:
        directory(f"{PREP}/{{task}}"),
    log:
        f"{RES}/logs/prepare/{{task}}.log",
    params:
        code=lambda wc: code("prepare", task=wc.task),
        architecture=ARCHITECTURE,
        source=lambda wc: data_source(wc.task),
        task_file=lambda wc: task_file_flag(wc.task),
        declaration=lambda wc: task_declaration(wc.task),
        model=MODEL,
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
        " --architecture {params.architecture}"
        " {params.task_file} > {log:q} 2>&1"
