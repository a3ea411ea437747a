"""Evaluation: MMEB precision@1 (mmeb.py), SugarCrepe and SugarCrepe++ (sugarcrepe.py), their
reports (report.py), and the stages that run them (stage.py: eval_plain, eval_zero_shot,
eval, report)."""
