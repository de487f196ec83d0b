"""The agent: the multi-turn loop, the toolbox that runs its calls, run setup, traces."""
