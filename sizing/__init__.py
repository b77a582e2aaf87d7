"""Host sizing: pure functions from host facts and a profile to verdicts and a plan."""
