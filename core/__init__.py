"""The domain core, lowest layer: model families, the stage plan, network specs, the dilated-middle variant,
weight loading and the flat-tensor network modules. Everything else imports from here; it imports nothing
of the project's other layers."""
