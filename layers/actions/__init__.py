"""Actions: the typed catalog, the autonomy policy, approvals, execution and the root helper.

The pipeline's meta stage hands its proposals to
``layers.actions.service.handle_proposals(incident_id, proposals, store, settings, runs=…)``.
"""
