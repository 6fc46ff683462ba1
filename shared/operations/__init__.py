"""Operations on Tabby's state with the rules that keep them safe: the local facade, the maintenance role on Modal
Volumes (reload/commit, leases, the server check), the remote form, and the doctor. Built on `shared.state`."""
