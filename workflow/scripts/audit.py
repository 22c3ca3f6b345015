import logging

from esparse.audit import audit, format_result
from esparse.io import atomic_path
from esparse.pipeline import step_logging

with step_logging(snakemake.log[0], snakemake.threads):
    result = audit(snakemake.params.results, against=snakemake.params.against, rerun=snakemake.params.rerun,
                   windows=snakemake.params.windows, resources_dir=snakemake.params.resources,
                   data_mirror=snakemake.params.mirror)
    logging.getLogger("esparse").info("\n%s", format_result(result))
    if not result.ok:
        raise RuntimeError(format_result(result).strip().splitlines()[-1])
    with atomic_path(snakemake.output[0]) as tmp:
        tmp.write_text(format_result(result, verbose=True))
