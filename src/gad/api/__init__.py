"""Layer 3, the API side: the chat client and its errors, collect, judge, label."""
