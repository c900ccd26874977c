"""One module per command (prune, evaluate, sweep, recover, distill, instructions): each a
public function in a few named steps that validate before loading, place the model, call the
layers below, and write the results. ``codeprune.api`` re-exports them."""
