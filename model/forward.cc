// Placeholder: work in progress.
