# One merge rule per registered method (pipeline/methods/__init__.py), generated from its row:
# its inputs from what the row needs (Fisher diagonals, the tagged basis, projected Hessians),
# its wildcards from the settings that name its artifacts (`uses`). One job merges a whole α
# sweep (every α of one (k, fraction)) in one pass over the inputs; its outputs are the per-α
# artifacts merged/{method}/{setting}.zarr. Adding an α re-runs the sweeps that hold it and
# nothing else. Each rule's params carry only its own method's settings: changing
# merge.ties_sign re-runs the TIES merges, not Task Arithmetic's.


for _name in METHODS:
    check_row(_name)

    rule:
        name:
            f"merge_{_name}"
        input:
            **merge_rule_inputs(_name),
        output:
            [directory(f"{RESULTS}/merged/{_name}/{s}.zarr") for s in sweep_settings(_name)],
        log:
            f"{RESULTS}/logs/merge/{'_'.join(filter(None, [_name, sweep_label(_name)]))}.log",
        conda:
            ENV
        threads: 1
        resources:
            **job_resources("merge"),
            **knobs("merge"),
        params:
            method=_name,
            inputs=merge_inputs_option(_name),
            settings=merge_settings(_name),
            dtype=MERGE["dtype"],
            version=ARTIFACT_VERSION,
        shell:
            MERGE_SHELL
