"""The one runtime path: logits, OOD statistics and Grad-CAM, for training's evaluation, evaluate, predict, explain and serve."""
