"""What the tests share: engines and their settings, generation helpers and the oracle's
comparisons, SAE files of each suite with their reference encoders, and dense encodings."""
