# Masks: every method writes one mask per budget from one ranking (nested masks); bitfit's
# mask is fixed by the architecture and written once, under main_budget. A method that trains
# before it ranks (magnitude) also writes the weights stage 2 starts from (rule mask_started).


rule mask:
    input:
        unpack(mask_inputs),
    output:
        [mask_file("{method}", "{task}", "{seed}", budget_label(b)) for b in BUDGETS],
    wildcard_constraints:
        method="|".join(map(re.escape, [m for m in BUDGETED if m not in STARTED + ["bayestune"]])),
    log:
        f"{RES}/logs/mask/{{method}}/{{task}}/seed{{seed}}.log",
    params:
        code=lambda wc: code("mask", method=wc.method, task=wc.task),
        architecture=ARCHITECTURE,
        model=MODEL,
        device=config["device"],
        gpu_slots=lambda wc: gpu_slot_flags(wc.method in GRADIENT),
        budgets=budgets_flag(BUDGETS),
        out_dir=lambda wc: os.path.dirname(mask_file(wc.method, wc.task, wc.seed, "x",
                                                     preset_of(wc))),
        inputs=mask_options,
        flags=mask_flags,
        task_file=lambda wc: task_file_flag(wc.task),
        declaration=lambda wc: task_declaration(wc.task),
    threads: res("mask", "threads")
    resources:
        gpu=lambda wc: GPU if wc.method in GRADIENT else 0,
        mem_mb=res("mask", "mem_mb"),
        runtime=res("mask", "runtime"),
    conda:
        "../envs/bayestune.yaml"
    shell:
        "OMP_NUM_THREADS={threads} python -m bayestune mask --method {wildcards.method}"
        " --task {wildcards.task} --model {params.model:q} --seed {wildcards.seed}"
        " --architecture {params.architecture}"
        " --budgets {params.budgets} --out-dir {params.out_dir:q} --device {params.device}"
        " {params.gpu_slots} {params.inputs} {params.flags} {params.task_file} > {log:q} 2>&1"


# bitfit: one mask from the architecture alone (no scores, no data, no GPU), at main_budget.
use rule mask as mask_fixed with:
    output:
        mask_file("{method}", "{task}", "{seed}", budget_label(MAIN_BUDGET)),
    wildcard_constraints:
        method="|".join(map(re.escape, FIXED)),
    params:
        budgets=budgets_flag([MAIN_BUDGET]),
        device="cpu",
    threads: 1
    resources:
        gpu=0,
        mem_mb=res("mask", "mem_mb"),
        runtime=res("mask", "runtime"),


use rule mask as mask_started with:
    output:
        [mask_file("{method}", "{task}", "{seed}", budget_label(b)) for b in BUDGETS],
        start_file("{method}", "{task}", "{seed}"),
    wildcard_constraints:
        method="|".join(map(re.escape, STARTED)),


# bayestune: one mask job per stage-1 preset its candidates use, from that preset's scales.
use rule mask as mask_bayestune with:
    output:
        [mask_file("{method}", "{task}", "{seed}", budget_label(b), "{preset}") for b in BUDGETS],
    wildcard_constraints:
        method="bayestune",
    log:
        f"{RES}/logs/mask/{{method}}/{{preset}}/{{task}}/seed{{seed}}.log",
