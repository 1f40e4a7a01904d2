"""Layer 1, data: chat records, training examples, evaluation sets, labels, journals."""
