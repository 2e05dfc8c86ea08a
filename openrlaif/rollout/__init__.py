"""Generation engines behind one interface (`generate`, `update_weights`), chosen by `rollout.engine`."""
