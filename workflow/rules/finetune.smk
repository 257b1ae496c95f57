# Stage 2: restart from theta0 and fine-tune the masked scalars (or everything, or LoRA);
# writes the test/val scores and the sparse delta theta - theta0.


rule finetune:
    input:
        unpack(finetune_inputs),
    output:
        metrics=f"{RES}/finetune/{{method}}/{{task}}/{{label}}/seed{{seed}}/metrics.json",
        delta=f"{RES}/finetune/{{method}}/{{task}}/{{label}}/seed{{seed}}/delta.safetensors",
    log:
        f"{RES}/logs/finetune/{{method}}/{{task}}/{{label}}/seed{{seed}}.log",
    params:
        code=lambda wc: code("finetune", method=wc.method, task=wc.task),
        architecture=ARCHITECTURE,
        model=MODEL,
        device=config["device"],
        gpu_slots=gpu_slot_flags(),
        out_dir=lambda wc: run_dir(wc.method, wc.task, wc.label, wc.seed),
        source=finetune_source,
        flags=finetune_flags,
        task_file=lambda wc: task_file_flag(wc.task),
        declaration=lambda wc: task_declaration(wc.task),
    threads: res("finetune", "threads")
    resources:
        gpu=GPU,
        mem_mb=res("finetune", "mem_mb"),
        runtime=res("finetune", "runtime"),
    conda:
        "../envs/bayestune.yaml"
    shell:
        "OMP_NUM_THREADS={threads} python -m bayestune finetune --task {wildcards.task}"
        " --model {params.model:q} --data {input.data:q} --seed {wildcards.seed}"
        " --architecture {params.architecture}"
        " --out-dir {params.out_dir:q} --device {params.device} {params.gpu_slots}"
        " {params.source} {params.flags} {params.task_file}"
        " > {log:q} 2>&1"
