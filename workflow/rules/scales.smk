# Stage 1: SGLD sampling of the scales lambda; the posterior mean goes to the scale file.
# The checkpoint is a param, not an output: Snakemake then never deletes it when the job fails
# or is killed, and rerunning the same command resumes the sampler from it.


rule sample:
    input:
        data=lambda wc: prepared(wc.task),
    output:
        scales=scale_file("{preset}", "{task}", "{seed}"),
        # chain diagnostics (docs/ALGORITHM.md, "Diagnostics"), written beside the scales
        diagnostics=diagnostics_file("{preset}", "{task}", "{seed}", "diagnostics.json"),
        traces=diagnostics_file("{preset}", "{task}", "{seed}", "traces.safetensors"),
    log:
        f"{RES}/logs/sample/{{preset}}/{{task}}/seed{{seed}}.log",
    params:
        code=lambda wc: code("sample", task=wc.task),
        architecture=ARCHITECTURE,
        model=MODEL,
        device=config["device"],
        gpu_slots=gpu_slot_flags(),
        checkpoint=lambda wc: checkpoint_file(wc.preset, wc.task, wc.seed),
        flags=sampler_flags,
        task_file=lambda wc: task_file_flag(wc.task),
        declaration=lambda wc: task_declaration(wc.task),
    threads: res("sample", "threads")
    priority: 10  # the longest chain (sample -> mask -> finetune) starts first
    resources:
        gpu=GPU,
        mem_mb=res("sample", "mem_mb"),
        runtime=res("sample", "runtime"),
    conda:
        "../envs/bayestune.yaml"
    shell:
        "OMP_NUM_THREADS={threads} python -m bayestune sample --task {wildcards.task}"
        " --model {params.model:q} --data {input.data:q} --seed {wildcards.seed}"
        " --out {output.scales:q} --architecture {params.architecture}"
        " --checkpoint {params.checkpoint:q} --device {params.device} {params.gpu_slots}"
        " {params.flags} {params.task_file}"
        " > {log:q} 2>&1"
