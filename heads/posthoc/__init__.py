"""What is computed from a trained head after training: the temperature that calibrates its probabilities (fitted on
validation), the training split's mean embeddings, and the explanations of a prediction (what each modality says
alone, and where the token attention went)."""
