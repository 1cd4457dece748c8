"""The composed path: the local image work V3 can't do (spec section 7), and the tasks around it."""
