"""The three Modal apps: warmer (builds the image, checks its models), server (Tabby behind the proxy on a GPU) and
maintenance (snapshots, restore and the rest on the Volumes). Modal wiring only; the code they run is in `shared`."""
