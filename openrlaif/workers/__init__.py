"""Ray actors, one class per role, and the WorkerGroup that places and drives them."""
