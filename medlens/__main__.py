"""``python -m medlens``: the ``medlens`` command (what ``torchrun -m medlens train ...`` runs)."""

from medlens.cli import main

raise SystemExit(main())
