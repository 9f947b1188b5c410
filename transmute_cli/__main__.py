from transmute_cli.cli import main

main()
