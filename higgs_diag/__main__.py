"""``python -m higgs_diag``: the same as the ``higgs-diag`` command."""
from .cli import main

main(prog_name="higgs-diag")
