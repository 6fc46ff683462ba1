"""Operations on Tabby's state with the rules that keep them safe: their interface (`interface.Operations`), the
maintenance rules over two directories or Modal Volumes (reload/commit, leases, the server check), the remote form,
and the doctor. Built on `shared.state`."""
