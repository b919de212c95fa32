"""Fine-tuning tasks: what a label is and how it becomes targets (task.py), and how outputs are scored
(metrics.py). The heads live with the model (models/wav2vec2/heads.py), the step in training/finetune_step.py."""
