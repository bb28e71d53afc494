"""Multi-student distillation (MSD; Song et al. 2025, arXiv 2410.23274): K students, each owning a part of the
conditioning space, and a router that picks one per prompt. ``partition.py`` holds the partitioners and the router."""
