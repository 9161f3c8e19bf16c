"""The sd2 command-line front end (imports flows, tasks and sd2_core)."""
