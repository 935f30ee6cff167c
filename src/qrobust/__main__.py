"""``python -m qrobust`` runs the command line."""

from qrobust.cli import main

main()
