"""The ``qrobust`` command line: train, quantize, export, attack, certify, predict, analyze, report,
search, finetune, weight-bound, verify-quantization, plan.

One module per group of commands, options shared between commands declared once in ``options``. Every
module imports only typer, rich and qrobust's light modules (errors, checks, outputs, limits, runner):
a command checks its plain arguments first and imports the library (torch) inside its body, so
``--help`` and argument errors print at once. User errors (bad values, missing or corrupt files) end
in one ``error:`` line and exit code 2; results already written stay as they are.
"""

# isort: off
from qrobust.cli.core import app, main
from qrobust.cli import train, quantize, attack, smoothing, plan, analysis, search, finetune, bounds  # noqa: F401  (registers the commands, in this order)
# isort: on

__all__ = ["app", "main"]
