"""The exported scorer's program, `score.py`: `gunsound export` copies it, with the Ray-free modules it
imports (windows, events, decode), next to the exported model. It is not imported from the package."""
