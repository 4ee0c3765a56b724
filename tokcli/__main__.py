from tokcli.cli.app import main

main()
