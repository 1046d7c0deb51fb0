"""``python -m chaos``: see :mod:`chaos.runner`."""

from __future__ import annotations

from chaos.runner import main

raise SystemExit(main())
