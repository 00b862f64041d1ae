"""What goes to others: exports (`export`: weights, image processor, model card), model cards (`model_card`),
Hub pushes (`push`, the command `python -m gd_hf.push`), Gradio Spaces (`space`, the command
`python -m gd_hf.space`; `space_app`, the Space's app), and what they may say of this machine (`public`)."""
