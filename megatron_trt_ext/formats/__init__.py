"""Output formats: file layouts and atomicity. No knowledge of Megatron here."""
