"""Layer 3, the rewards a GAD-family step optimises, one file each, chosen once at setup
(`choice.choose`): the discriminator that learns online (`online`), a frozen scalar scorer
(`frozen`: the off-policy discriminator after its warmup, or a trained reward model), their mix
(`mix`), and the white-box teacher's exact log-probs (`whitebox`). Each gives the step a
`state.Signal` (`state.Reward`); the GAD step never asks which one it has."""
