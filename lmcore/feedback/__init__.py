"""Feedback: the store the server writes every generation and rating into (``store``), and the
harvest that turns it into validated, versioned training data (``harvest``)."""
