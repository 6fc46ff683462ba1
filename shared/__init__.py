"""Tabby on Modal: the code behind the three apps. Settings, the image recipe and the models sit at the top;
`serving/` runs Tabby, `state/` keeps its data, `operations/` runs maintenance on it, `cli/` is `tabby-modal`."""
