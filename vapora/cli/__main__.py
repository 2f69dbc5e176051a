"""``python -m vapora.cli`` runs the ``vapora`` command."""

from vapora.cli import main

raise SystemExit(main())
