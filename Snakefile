# Entry point: `snakemake --cores all` builds the tables and figures of config/config.yaml
# (the paper); `--configfile config/demo.yaml` runs the offline CPU demo. The default target
# is declared here because Snakemake ignores default_target in included files.


include: "workflow/Snakefile"


rule all:
    default_target: True
    input:
        all_targets(),
