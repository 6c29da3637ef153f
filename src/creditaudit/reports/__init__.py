"""Everything that turns a results folder into tables, verdicts, plots and documents. Reports read
run folders only: they never import the trainer and never train."""
