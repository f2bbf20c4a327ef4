"""``python -m lowrank_ggn`` runs the command-line main job."""

from lowrank_ggn.app.cli import main

raise SystemExit(main())
