"""``python -m eqaudit``: the same CLI as the ``eqaudit`` script."""

from eqaudit.cli import main

main()
